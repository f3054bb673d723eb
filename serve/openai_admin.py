"""The HTTP door's adapter admin (behind the admin token): list, load, unload, pin and unpin on the
engine's adapter cache, in vLLM's paths and bodies so Kubernetes routers can call them, and the
gRPC Admin service's meaning."""

from __future__ import annotations

from typing import Any, Sequence

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from adapterhub.errors import NotFound

from .cache import AdapterCache
from .openai_schema import AdapterAdminBody


def admin_routes(cache: AdapterCache, dependencies: Sequence[Any]) -> APIRouter:
    """The admin routes; ``dependencies`` check the admin token. Loads run in threads (they read
    and hash files) while the event loop serves the others."""
    router = APIRouter(dependencies=list(dependencies))

    @router.get("/v1/adapters")
    async def resident() -> dict[str, Any]:
        return {"object": "list", "data": [resident_entry(e) for e in cache.snapshot()]}

    @router.post("/v1/load_lora_adapter")
    async def load(body: AdapterAdminBody) -> dict[str, Any]:
        try:
            return {"adapter": resident_entry(await run_in_threadpool(cache.load, body.ref()))}
        except NotFound as exc:
            raise NotFound(body.not_found(exc)) from exc

    @router.post("/v1/unload_lora_adapter")
    async def unload(body: AdapterAdminBody) -> dict[str, Any]:
        ref, was = await run_in_threadpool(cache.unload, body.ref())
        return {"id": ref, "was_resident": was}

    @router.post("/v1/pin_adapter")
    async def pin(body: AdapterAdminBody) -> dict[str, Any]:
        return {"adapter": resident_entry(await run_in_threadpool(cache.set_pinned, body.ref(), True))}

    @router.post("/v1/unpin_adapter")
    async def unpin(body: AdapterAdminBody) -> dict[str, Any]:
        return {"adapter": resident_entry(await run_in_threadpool(cache.set_pinned, body.ref(), False))}

    return router


def resident_entry(entry: Any) -> dict[str, Any]:
    """A resident adapter as the admin answers show it."""
    return {"id": entry.key, "object": "adapter", "method": entry.method.name, "pinned": entry.pinned,
            "in_use": entry.in_use, "mixed_batch": entry.served is not None, "form": entry.form_kind}
