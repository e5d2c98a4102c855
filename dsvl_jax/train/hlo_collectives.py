"""The collectives that cross DCN in a multi-slice TPU program, read from `compiled.as_text()`.

Compiled for N slices (`get_topology_desc(..., num_slices=N)`), XLA TPU emits one program per slice
(`num_partitions` = chips of one slice): collectives inside a slice stay all-reduce / all-gather / ...
over ICI, and the part of a collective that crosses slices becomes a host-transfer `send`/`recv` pair
handled by the megascale runtime (`_xla_megascale_transfer_type="ALL_REDUCE"`, `ALL_GATHER`, ...).
Those sends are what this module counts: kind, per-chip payload (the send's operand), how often each runs
per step (the product of the trip counts of the while loops around it: the micro-batch scan, the layer
scan; `known_trip_count`, else the condition's `i < N`) and whether the scheduler put compute between the `send` and its `send-done` (the transfer
then overlaps that compute; the text of a scheduled module lists instructions in schedule order).

DCN bytes per chip are a ring estimate over s slices: all-reduce 2(s-1)/s x payload, all-gather (s-1) x
payload (the local piece), reduce-scatter (s-1)/s x payload, anything else its payload. An estimate of
the wire traffic, not a measurement.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|called_computations)="
                     r"(%[\w.\-]+|\{[%\w.\-, ]*\})")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_COMPUTE = ("fusion", "convolution", "dot", "custom-call")


def shape_bytes(text: str) -> float:
    """Bytes of an HLO result type: one array `bf16[8,128]{1,0}` or a tuple of them."""
    return sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in _SHAPE.findall(text))


def _parse(hlo: str):
    """{computation: [(name, result type, op, rest of line)]}, the entry's name."""
    comps, entry, cur = {}, None, None
    for line in hlo.splitlines():
        if line[:1] not in ("", " ", "}") and line.rstrip().endswith("{") and not line.startswith("HloModule"):
            head = line.split()
            is_entry = head[0] == "ENTRY"
            cur = head[1 if is_entry else 0].lstrip("%")
            comps[cur] = []
            entry = cur if is_entry else entry
            continue
        if cur is None:
            continue
        m = _INSTR.match(line)
        if m:
            comps[cur].append(m.groups())
    return comps, entry


def _trip_from_condition(comps, while_attrs: str) -> int:
    """A while without `known_trip_count` (TPU's compiled text): its condition `i < constant(N)` gives N."""
    m = re.search(r"condition=%?([\w.\-]+)", while_attrs)
    cond = comps.get(m.group(1), []) if m else []
    consts = [int(c.group(1)) for _, _, op, rest in cond if op == "constant"
              for c in [re.match(r"(-?\d+)\)", rest)] if c]
    if len(consts) != 1 or not any(op == "compare" and "direction=LT" in rest for _, _, op, rest in cond):
        raise ValueError(f"cannot read the trip count of a while loop from its condition {m and m.group(1)}")
    return consts[0]


def _multipliers(comps, entry) -> dict[str, int]:
    """How many times each computation runs per execution of the entry (while bodies x trip count)."""
    mult = defaultdict(int)

    def visit(comp, times):
        mult[comp] += times
        for _, _, op, rest in comps.get(comp, ()):
            trip = _TRIP.search(rest)
            for key, names in _CALLED.findall(rest):
                for callee in (n.strip(" %") for n in names.strip("{}").split(",")):
                    if callee in comps and key != "to_apply":  # to_apply: a reducer's scalar body
                        n = 1
                        if op == "while" and key == "body":
                            n = int(trip.group(1)) if trip else _trip_from_condition(comps, rest)
                        visit(callee, times * n)
    visit(entry, 1)
    return mult


def dcn_transfers(hlo: str) -> list[dict]:
    """Every megascale (cross-slice) send: kind, per-chip payload bytes, runs per step, overlapped compute."""
    comps, entry = _parse(hlo)
    mult = _multipliers(comps, entry)
    out = []
    for comp, instrs in comps.items():
        for i, (name, rtype, op, rest) in enumerate(instrs):
            kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', rest)
            if op != "send" or not kind:
                continue
            overlap = 0
            for _, _, op2, rest2 in instrs[i + 1:]:
                if op2 == "send-done" and re.match(rf"%?{re.escape(name)}\)", rest2):
                    break
                overlap += op2 in _COMPUTE
            payload = shape_bytes(" ".join(map("[".join, _SHAPE.findall(rtype)[:1])) + "]")  # (data, u32, token)
            out.append(dict(name=name, kind=kind.group(1), computation=comp, runs=mult.get(comp, 0),
                            payload=payload, overlap_ops=overlap))
    return out


def dcn_bytes(kind: str, payload: float, slices: int) -> float:
    s = slices
    return {"ALL_REDUCE": 2 * (s - 1) / s * payload, "ALL_GATHER": (s - 1) * payload,
            "REDUCE_SCATTER": (s - 1) / s * payload}.get(kind, payload)


def dcn_summary(hlo: str, slices: int) -> dict:
    """The cross-slice transfers of a step, with per-chip payload and DCN bytes per step."""
    rows = [dict(t, dcn_bytes=dcn_bytes(t["kind"], t["payload"], slices)) for t in dcn_transfers(hlo)]
    return dict(transfers=rows, slices=slices, count=len(rows), runs_per_step=sum(r["runs"] for r in rows),
                payload_bytes_per_step=sum(r["payload"] * r["runs"] for r in rows),
                dcn_bytes_per_step=sum(r["dcn_bytes"] * r["runs"] for r in rows),
                overlapped_runs=sum(r["runs"] for r in rows if r["overlap_ops"] > 0),
                overlapped_bytes=sum(r["dcn_bytes"] * r["runs"] for r in rows if r["overlap_ops"] > 0))


def format_summary(s: dict) -> str:
    kinds = defaultdict(lambda: [0, 0.0])
    for r in s["transfers"]:
        kinds[r["kind"]][0] += r["runs"]
        kinds[r["kind"]][1] += r["dcn_bytes"] * r["runs"]
    detail = ", ".join(f"{k.lower()} x{n} {b / 2**30:.3g} GiB" for k, (n, b) in sorted(kinds.items()))
    total = s["dcn_bytes_per_step"] or 1.0
    return (f"DCN per chip per step ({s['slices']} slices, ring estimate): {s['dcn_bytes_per_step'] / 2**30:.4g} GiB "
            f"in {s['runs_per_step']} transfers [{detail}]; {s['overlapped_bytes'] / total:.0%} of those bytes "
            f"({s['overlapped_runs']} transfers) have compute scheduled between send and send-done")
