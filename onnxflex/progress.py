"""Progress bars (tqdm) that can be switched off for quiet runs and tests."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, enable: bool = True, leave: bool = True, unit: str = "it"):
    """A tqdm bar on stderr; disabled (no output, same API) when ``enable`` is False."""
    return tqdm(total=total, desc=desc, disable=not enable, leave=leave, unit=unit, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)
