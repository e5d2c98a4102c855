"""Which parameters each training stage updates (paper §3.2, Figure 3), as path patterns.

- Stage 1 (VL adaptor warm-up): the adaptor only.
- Stage 2 (joint VL pretraining): the LLM + the adaptor.
- Stage 3 (SFT): the LLM + the adaptor + SigLIP (SAM-B stays frozen: GPU memory in the paper).

"Adaptor" includes, for the 7B, the SAM-side layers the paper counts as part of it (§3.1: the resize and
the two stride-2 convs) and what the official `HybridVisionTower` leaves trainable when SAM is not
frozen: the necks (`neck`, `neck_hd`), the down-sampling convs and the hd alpha.

The same path patterns pick the params `config.init.reinit` takes from a fresh init (`reinit`).
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

from flax import traverse_util

ADAPTOR = ("aligner/", "vision/sam/downsample/", "vision/sam/neck/", "vision/sam/neck_hd/", "vision/sam/hd_alpha")
LLM = ("language_model/",)
SIGLIP = ("vision/siglip/",)
SAM = ("vision/sam/",)
# Never trained: stored in the checkpoints, never used by the forward pass.
UNUSED = ("vision/siglip/head/", "vision/high_layer_norm/", "vision/low_layer_norm/")

GROUPS = {"adaptor": ADAPTOR, "llm": LLM, "siglip": SIGLIP, "sam": SAM}
# The paper's trainable sets, by group name; STAGE_TRAINABLE is the same as path prefixes.
STAGE_GROUPS = {1: ("adaptor",), 2: ("adaptor", "llm"), 3: ("adaptor", "llm", "siglip")}
STAGE_TRAINABLE = {stage: sum((GROUPS[g] for g in groups), ()) for stage, groups in STAGE_GROUPS.items()}


def patterns_for(stage: int | None, trainable: Sequence[str] = ()) -> tuple:
    """Path prefixes (or `re:` regexes) of the trainable params: the stage's set, or an explicit list.

    Items of `trainable` may be group names (adaptor, llm, siglip, sam) or path prefixes."""
    if trainable:
        out = []
        for t in trainable:
            out.extend(GROUPS.get(t, (t,)))
        return tuple(out)
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"stage={stage!r}: expected 1, 2 or 3 (or an explicit `trainable` list)")
    return STAGE_TRAINABLE[stage]


def path_matches(path: str, patterns: Iterable[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], path):
                return True
        elif path == p.rstrip("/") or path.startswith(p if p.endswith("/") else p + "/") or path == p:
            return True
    return False


def trainable_mask(params, patterns: Sequence[str]):
    """A tree of bools like `params`: True where the param is trained. Unused params never are."""
    flat = traverse_util.flatten_dict(params, sep="/")
    mask = {k: path_matches(k, patterns) and not path_matches(k, UNUSED) for k in flat}
    return traverse_util.unflatten_dict(mask, sep="/")


def count(params, mask) -> tuple:
    """(trainable, total) parameter counts."""
    flat_p = traverse_util.flatten_dict(params, sep="/")
    flat_m = traverse_util.flatten_dict(mask, sep="/")
    total = sum(math.prod(v.shape) for v in flat_p.values())
    train = sum(math.prod(v.shape) for k, v in flat_p.items() if flat_m[k])
    return train, total


def reinit(params, fresh, patterns):
    """Take `fresh` values for every param whose path matches `patterns`; keep the others."""
    if not patterns:
        return params
    flat, new = traverse_util.flatten_dict(params, sep="/"), traverse_util.flatten_dict(fresh, sep="/")
    hit = [k for k in flat if path_matches(k, patterns)]
    if not hit:
        raise ValueError(f"init.reinit patterns {list(patterns)} match no parameter")
    for k in hit:
        flat[k] = new[k]
    return traverse_util.unflatten_dict(flat, sep="/")
