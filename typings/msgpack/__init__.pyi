# The part of msgpack (1.x) gradwatch uses; msgpack ships no type information.
from collections.abc import Callable
from typing import Any

class UnpackException(Exception): ...
class UnpackValueError(UnpackException, ValueError): ...
class ExtraData(UnpackValueError): ...

def packb(o: Any, *, use_bin_type: bool = ...) -> bytes: ...
def unpackb(
    packed: bytes,
    *,
    raw: bool = ...,
    strict_map_key: bool = ...,
    object_pairs_hook: Callable[[list[tuple[Any, Any]]], Any] | None = ...,
    ext_hook: Callable[[int, bytes], Any] = ...,
    timestamp: int = ...,
) -> Any: ...
