"""Integer scalar buffers (FIFO pointers, fill counts) that the host reads every step without a
device sync.

The buffer stays the checkpointed truth; the module keeps a Python mirror of it that every write
through `set_host_int` updates (`fill_` with a Python number is asynchronous on a GPU), so reading
it costs nothing. The mirror is read from the buffer once, lazily, after construction or after a
`load_state_dict` (a post hook forgets it), i.e. one sync per run instead of one per step.
"""

from torch import nn


def _mirror(module: nn.Module) -> dict[str, int]:
    cache = module.__dict__.get("_host_ints")
    if cache is None:
        cache = module.__dict__["_host_ints"] = {}
        module.register_load_state_dict_post_hook(lambda m, keys: m.__dict__["_host_ints"].clear())
    return cache


def host_int(module: nn.Module, name: str) -> int:
    """The value of the integer scalar buffer `module.<name>`, from the host mirror."""
    cache = _mirror(module)
    if name not in cache:
        cache[name] = int(getattr(module, name))
    return cache[name]


def set_host_int(module: nn.Module, name: str, value: int) -> None:
    """Write `value` into the scalar buffer `module.<name>` and its host mirror."""
    getattr(module, name).fill_(value)
    _mirror(module)[name] = int(value)
