"""The server's malloc setting: applied where the C library is glibc, a clean no-op elsewhere."""

import platform

import pytest

from adapterhub.serve.malloc import limit_arenas


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_limit_arenas_is_accepted_by_glibc():
    assert limit_arenas(8) is True  # 8: the default for these 2 cores' 8x rule is 16; nothing else depends on it
