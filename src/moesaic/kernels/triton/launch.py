"""Launch configurations for the Triton MoE kernels, and the heuristic used before a shape is tuned.

A `MoEConfig` fixes the path ("grouped": align + two grouped GEMMs + combine; "decode": two
matrix-vector kernels, no alignment; "fused": one kernel per call, see fused_decode.py), the row block
BM shared by both grouped GEMMs, and one `GemmConfig` per GEMM (for "fused": gemm1 = F slice BF, w13
load width BK, warps, stages; gemm2 = w2 rows per load BD, and bk = BF again). They round-trip through plain dicts so the autotuner can store them as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PATHS = ("grouped", "decode", "fused")


@dataclass(frozen=True)
class GemmConfig:
    bn: int
    bk: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tma: int = 0  # operand tiles through tensor descriptors (Hopper TMA) where the layout allows; 2 (w13):
    #               also x, gathered into sorted rows by an extra pass
    persistent: int = 0  # 1: ~one program per multiprocessor looping over the live tiles; 2: loops flattened


@dataclass(frozen=True)
class MoEConfig:
    path: str
    bm: int
    gemm1: GemmConfig
    gemm2: GemmConfig
    tail_bm: int = 0  # > 0: tail tiles (align.py) in the inference forward; training keeps uniform bm blocks
    pdl: int = 0  # decode path: 1 = programmatic dependent launch (w2 streams while w13 ends; sm_90+ only)
    tail_merge: int = 0  # with tail_bm: 1 = an expert's lone tail tile runs in its last main tile's program (align.py)

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"MoEConfig.path must be one of {PATHS}, got {self.path!r}")
        for name, v in (("bm", self.bm), ("gemm1.bn", self.gemm1.bn), ("gemm1.bk", self.gemm1.bk),
                        ("gemm2.bn", self.gemm2.bn), ("gemm2.bk", self.gemm2.bk)):
            if v < 1 or v & (v - 1):
                raise ValueError(f"MoEConfig.{name} must be a power of two, got {v}")
        for name, g in (("gemm1", self.gemm1), ("gemm2", self.gemm2)):
            if int(g.persistent) not in (0, 1, 2) or int(g.tma) not in (0, 1, 2):
                raise ValueError(f"MoEConfig.{name}.tma and .persistent must be 0, 1 or 2, got {g.tma!r}, "
                                 f"{g.persistent!r}")
        if self.path == "fused" and self.gemm2.bk != self.gemm1.bn:
            raise ValueError(f"MoEConfig.gemm2.bk must equal gemm1.bn for the fused path (both are the F slice "
                             f"of a program), got {self.gemm2.bk} and {self.gemm1.bn}")
        if self.path == "grouped" and self.bm < 16:
            raise ValueError(f"MoEConfig.bm must be >= 16 for the grouped path (tl.dot), got {self.bm}")
        t = self.tail_bm
        if t and (self.path != "grouped" or t < 16 or t >= self.bm or t & (t - 1)):
            raise ValueError(f"MoEConfig.tail_bm must be 0 (off) or, on the grouped path, a power of two with "
                             f"16 <= tail_bm < bm ({self.bm}), got {t!r}")
        if self.tail_merge not in (0, 1) or (self.tail_merge and not t):
            raise ValueError(f"MoEConfig.tail_merge must be 0, or 1 with tail tiles (tail_bm > 0), got "
                             f"{self.tail_merge!r} (tail_bm {t})")
        if self.pdl not in (0, 1) or (self.pdl and self.path != "decode"):
            raise ValueError(f"MoEConfig.pdl must be 0, or 1 on the decode path, got {self.pdl!r} ({self.path})")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> MoEConfig:
        return MoEConfig(path=d["path"], bm=int(d["bm"]), gemm1=GemmConfig(**d["gemm1"]),
                         gemm2=GemmConfig(**d["gemm2"]), tail_bm=int(d.get("tail_bm", 0)), pdl=int(d.get("pdl", 0)),
                         tail_merge=int(d.get("tail_merge", 0)))


def rows_per_expert(t: int, e: int, k: int) -> float:
    return t * k / e


def bm_candidates(t: int, e: int, k: int) -> list[int]:
    """Row-block sizes worth trying for ~t*k/e rows per expert."""
    r = rows_per_expert(t, e, k)
    if r <= 16:
        return [16]
    if r <= 48:
        return [16, 32]
    if r <= 128:
        return [32, 64, 128]
    return [64, 128]


def tail_candidates(bm: int) -> list[int]:
    """Tail-tile row counts worth trying at row block bm (large T only: bm >= 64)."""
    return [32, 64] if bm >= 128 else [16, 32] if bm == 64 else []


def heuristic(t: int, d: int, f: int, e: int, k: int) -> MoEConfig:
    """A reasonable untuned choice (used on a cache miss when tuning is off, and on CPU)."""
    if t * k <= 16:  # pdl: taken only where the GPU has it (ops.pdl_available); it does not change the sums
        return MoEConfig("decode", 1, GemmConfig(8, 256, 1, 4, 2), GemmConfig(4, 128, 1, 4, 2), pdl=1)
    bm = bm_candidates(t, e, k)[-1]
    if bm <= 32:
        g = GemmConfig(64, 128, 4, 4, 4)
        return MoEConfig("grouped", bm, g, g)
    return MoEConfig("grouped", bm, GemmConfig(128, 64, 8, 8, 3), GemmConfig(128, 64, 8, 8, 3))


def gemm_candidates(bm: int, which: str, tma: bool = False, persistent: bool = False) -> list[GemmConfig]:
    """Configs the autotuner tries for one grouped GEMM at row block bm (which: "gemm1" or "gemm2").
    tma / persistent add the tensor-descriptor and persistent-grid variants (bm >= 64 only: large T)."""
    if bm <= 32:
        c = [GemmConfig(64, 128, 4, 4, 4), GemmConfig(128, 64, 4, 4, 4), GemmConfig(128, 128, 4, 8, 3),
             GemmConfig(32, 256, 4, 4, 3)]
        return c if which == "gemm1" else c + [GemmConfig(64, 256, 4, 4, 3)]
    if which == "gemm1":  # two accumulators (gate, up): half the columns of gemm2 for the same registers
        c = [GemmConfig(64, 64, 8, 4, 4), GemmConfig(128, 64, 8, 8, 3), GemmConfig(128, 64, 8, 8, 4),
             GemmConfig(64, 128, 8, 8, 3)]
        t = [GemmConfig(128, 64, 8, 8, 3, 1), GemmConfig(128, 64, 8, 8, 4, 1), GemmConfig(128, 64, 16, 8, 4, 1),
             GemmConfig(64, 128, 8, 8, 3, 1), GemmConfig(128, 64, 8, 8, 3, 2), GemmConfig(128, 64, 8, 8, 4, 2)]
        p = [GemmConfig(128, 64, 8, 8, 4, 0, 1)]
        tp = [GemmConfig(128, 64, 8, 8, 4, 1, 1), GemmConfig(128, 64, 8, 8, 3, 1, 2), GemmConfig(128, 64, 8, 8, 3, 2, 2)]
    else:
        c = [GemmConfig(128, 64, 8, 4, 4), GemmConfig(128, 64, 8, 8, 4), GemmConfig(256, 64, 8, 8, 3),
             GemmConfig(128, 128, 8, 8, 3)]
        t = [GemmConfig(256, 64, 8, 8, 3, 1), GemmConfig(256, 64, 8, 8, 4, 1), GemmConfig(128, 64, 8, 8, 4, 1),
             GemmConfig(128, 128, 8, 8, 3, 1), GemmConfig(256, 64, 16, 8, 3, 1)]
        p = [GemmConfig(256, 64, 8, 8, 3, 0, 1)]
        tp = [GemmConfig(256, 64, 8, 8, 3, 1, 1), GemmConfig(256, 64, 8, 8, 3, 1, 2)]
    if bm == 64:  # one warpgroup per 64-row tile (m64 wgmma): fewer padding rows per expert than bm 128
        w4 = GemmConfig(128, 64, 8, 4, 4) if which == "gemm1" else GemmConfig(256, 64, 8, 4, 3)
        c, t = c + [w4], t + [GemmConfig(w4.bn, w4.bk, w4.group_m, 4, w4.num_stages, 1)]
    return c + (t if tma else []) + (p if persistent else []) + (tp if tma and persistent else [])


def decode_candidates(which: str) -> list[GemmConfig]:
    """Decode-path configs: few weight rows per program, loads of 256-1024 bytes per row, the next tile
    loaded one iteration ahead (decode.py), so many programs each keep two tiles in flight. On the H200
    (session 6) w13 won at BN 4-16 x BK 128-512 and w2 at BK 64-128 (its [KP, BN, BK] tile spans all K experts:
    KP * BN * BK <= 32K values keeps it in registers) on every benchmark shape."""
    if which == "gemm1":
        return [GemmConfig(8, 256, 1, 4, 2), GemmConfig(4, 256, 1, 2, 2), GemmConfig(16, 256, 1, 4, 2),
                GemmConfig(8, 128, 1, 4, 2), GemmConfig(4, 512, 1, 4, 2), GemmConfig(16, 128, 1, 8, 2)]
    return [GemmConfig(4, 128, 1, 4, 2), GemmConfig(8, 128, 1, 4, 2), GemmConfig(2, 128, 1, 4, 2),
            GemmConfig(4, 256, 1, 4, 2), GemmConfig(4, 64, 1, 4, 2), GemmConfig(8, 256, 1, 8, 2)]


def fused(bf: int, bk: int, bd: int, num_warps: int, num_stages: int) -> MoEConfig:
    """A fused-path config: F slice bf per program, w13 loads bk wide along D, w2 loads bd rows."""
    return MoEConfig("fused", 1, GemmConfig(bf, bk, 1, num_warps, num_stages), GemmConfig(bd, bf, 1, num_warps,
                                                                                           num_stages))


def fused_candidates() -> list[MoEConfig]:
    """Fused-path configs the autotuner times. Programs = T*K*F/BF: BF 16-64 gives a fine-grained layer at T = 1
    (8 pairs, F 768) 96-384 programs for 132 multiprocessors. BF >= 32 reads >= 64 contiguous bytes of each
    bf16 w2 row (DRAM bursts); BF 16 trades that for twice the programs and twice the atomics. The kernel
    holds the current and the next 16-bit w13 tiles (2*BF*BK values each; since session 6 each tile is reduced to
    per-row sums as it arrives, `decode.gate_up_sums`, as on the decode path). w2 tiles BD x BF are 8-16K values
    (16-32 KB)."""
    return [fused(32, 128, 256, 8, 2), fused(16, 256, 512, 8, 2), fused(64, 64, 128, 8, 2),
            fused(16, 128, 256, 4, 2), fused(32, 64, 128, 4, 2), fused(32, 256, 256, 8, 2),
            fused(16, 512, 512, 8, 2), fused(64, 128, 128, 8, 2)]
