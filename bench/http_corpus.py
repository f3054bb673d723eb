"""Prompts of real English for ``bench/http_peer.py``: a fixed corpus written into the bench, no download.

Real prose, not random words: on random words a pretrained model's greedy choices are near-ties,
and a benchmark that compares servers' outputs should measure the servers, not float noise.
Each prompt is consecutive sentences of :data:`SENTENCES` (a start and a stride per prompt, so the
prompts differ), cut after exactly ``tokens`` tokens.
"""

from __future__ import annotations

SENTENCES = (
    "The river had risen overnight, and by morning the lower fields were a sheet of brown water with fence posts standing in it like the masts of sunken boats.",
    "My grandmother kept her recipes in a tin box, each card stained with butter and written in a hand that grew smaller as the years went on.",
    "When the train finally left the station, the children pressed their faces to the window and waved at the cows as if they were old friends.",
    "A good map tells you not only where the roads go but also which of them are worth taking when the weather turns bad.",
    "The library was quiet except for the ticking of the clock above the door and the occasional rustle of a newspaper being folded.",
    "Scientists measured the temperature of the lake every hour for three summers and found that the deep water warmed far more slowly than the surface.",
    "He repaired the old bicycle with parts from three others, and it rode better than any of them had when they were new.",
    "In the small town where I grew up, everyone knew the baker by name, and he knew exactly how each of us liked our bread.",
    "The committee agreed to postpone the vote until the next meeting, when more members would be able to attend and the budget figures would be ready.",
    "Walking along the cliffs at dusk, we watched the fishing boats come home one by one, their lights swinging gently with the waves.",
    "Most of the letters were about ordinary things: the price of coal, a neighbour's new baby, and the long winter that would not seem to end.",
    "The garden was planted in neat rows of beans, onions and potatoes, with a border of marigolds to keep the insects away.",
    "After the storm passed, the village came together to clear the fallen trees from the road and repair the roof of the school.",
    "She learned to play the piano by ear, listening to the radio in the kitchen and picking out the melodies one note at a time.",
    "The museum's new exhibition traces the history of printing, from carved wooden blocks to the machines that filled whole rooms.",
    "Every spring the swallows returned to the barn, building their nests of mud under the same beams they had used the year before.",
    "The doctor explained that the treatment would take several weeks and that rest was just as important as the medicine itself.",
    "On clear nights my father would take us into the yard and point out the constellations, telling the old stories behind their names.",
    "The bridge had been built more than a century ago, and its stone arches still carried the traffic of the busy road without complaint.",
    "Travellers often underestimate how cold the desert becomes after sunset, when the heat of the day escapes into the open sky.",
    "The company announced that it would open a new factory in the north, bringing several hundred jobs to a region that badly needed them.",
    "We spent the afternoon in the attic, sorting through boxes of photographs and trying to guess who the smiling strangers might have been.",
    "A cup of tea, a warm blanket and a long book are, for many people, the best possible answer to a rainy Sunday.",
    "The teacher asked each student to write a short essay about a place that mattered to them and to explain why.",
    "Farmers in the valley have grown apples for generations, and the harvest festival each autumn draws visitors from across the country.",
    "The lighthouse keeper wrote in his log every evening, noting the wind, the state of the sea and the ships that passed in the night.",
    "When the power failed, the whole street went dark, and for a moment we could hear nothing but the rain on the windows.",
    "The old market square was filled with stalls selling cheese, honey, wool and wooden toys carved by hand in the hills nearby.",
    "Learning a new language as an adult is slow work, but each small success makes the next lesson a little easier to face.",
    "The hikers reached the summit just before noon and sat on the rocks to eat their sandwiches while the clouds drifted below them.",
    "Her first novel was rejected by eleven publishers before a small press in the city agreed to print a few hundred copies.",
    "The ferry crossed the bay twice a day, carrying cars, bicycles, crates of vegetables and the occasional nervous dog.",
)


def prompts(tokenizer, n: int, tokens: int = 100) -> list[str]:
    """``n`` distinct prompts of exactly ``tokens`` tokens each: consecutive sentences (a start and a
    stride per prompt) cut after token ``tokens``. A cut is kept only where its text tokenizes back
    to the same ids, so every server (and the reference, batched without padding) sees them."""
    count = len(SENTENCES)
    texts: list[str] = []
    for k in range(4 * count):
        start, stride = k % count, (1, 3, 5, 7)[k // count]  # strides coprime with the 32 sentences
        text = " ".join(SENTENCES[(start + j * stride) % count] for j in range(2 + tokens // 20))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        cut = tokenizer.decode(ids)
        if len(ids) == tokens and tokenizer(cut, add_special_tokens=False)["input_ids"] == ids and cut not in texts:
            texts.append(cut)
        if len(texts) == n:
            return texts
    raise ValueError(f"http_corpus.prompts: {n} prompts of {tokens} tokens asked, {len(texts)} made "
                     f"(at most {4 * count} candidates); ask for fewer")
