"""The compression methods of a plan: names and the codes the runtime works with.

Method names (docs/PLAN_FORMAT.md): ``full``; ``arrow:k`` (1-D band of half-width N_img//(2k) over the
flattened image tokens, text rows and columns kept: the mask is :func:`pallas_kernels.arrow_mask`); ``cache`` (the head's attention output, before the output
projection, from the previous step); ``wars:k`` (V1 window attention + the residual full − window stored at
the head's last full step); ``cfg_share`` and ``cfg_share+arrow:k`` (SD3 only: the conditional half's output,
full or arrow, is used for both CFG halves).

In the runtime every (step, layer, head) is an int code plus a half-window in tokens for the actual
resolution; this module is the single place that maps names to those numbers.
"""

from __future__ import annotations

import dataclasses
import re


FULL, ARROW, CACHE, WARS, CFG_SHARE, CFG_SHARE_ARROW = range(6)
CODE_NAMES = {FULL: "full", ARROW: "arrow", CACHE: "cache", WARS: "wars", CFG_SHARE: "cfg_share",
              CFG_SHARE_ARROW: "cfg_share+arrow"}
WINDOWED = (ARROW, WARS, CFG_SHARE_ARROW)  # codes whose k sets a band
CFG_CODES = (CFG_SHARE, CFG_SHARE_ARROW)

_NAME = re.compile(r"^(full|cache|cfg_share|arrow:(\d+)|wars:(\d+)|cfg_share\+arrow:(\d+))$")


@dataclasses.dataclass(frozen=True, slots=True)
class Method:
    code: int
    k: int = 0  # the band is N_img / k wide (half-width N_img // (2k)); 0 for methods without a band

    @property
    def name(self) -> str:
        base = CODE_NAMES[self.code]
        return f"{base}:{self.k}" if self.code in WINDOWED else base

    def half_window(self, n_img: int) -> int:
        """Half-width in image tokens for ``n_img`` image tokens; -1 for no band (full / cache / cfg_share)."""
        return n_img // (2 * self.k) if self.code in WINDOWED else -1


def parse_method(name: str) -> Method:
    """``"arrow:8"`` -> Method(ARROW, 8). Raises ValueError naming the method for anything else."""
    name = name.strip() if isinstance(name, str) else name
    m = _NAME.match(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"unknown method {name!r}: expected full, cache, cfg_share, arrow:K, wars:K or "
                         "cfg_share+arrow:K with an integer K >= 1")
    k = int(m.group(2) or m.group(3) or m.group(4) or 0)
    if name.startswith(("arrow:", "wars:", "cfg_share+arrow:")) and k < 1:
        raise ValueError(f"method {name!r}: K must be >= 1")
    base = name.split(":")[0]
    code = {"full": FULL, "cache": CACHE, "cfg_share": CFG_SHARE, "arrow": ARROW, "wars": WARS,
            "cfg_share+arrow": CFG_SHARE_ARROW}[base]
    return Method(code, k)
