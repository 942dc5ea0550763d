"""What the step benches share (imported as ``from _common import ...``; the benches put bench/ on sys.path)."""
import statistics

import mapet


def ratio_line(peer: str, mine: str, times: dict) -> str:
    """"mine vs peer": the ratio of the two medians, then the median and range of the per-round
    ratios. The runs are interleaved round by round, so one round's two runs met the same machine
    speed: on a host whose speed drifts between minutes, the per-round median is the steadier one."""
    med = {k: statistics.median(times[k]) for k in (peer, mine)}
    rounds = sorted(p / m for p, m in zip(times[peer], times[mine]))
    return (f"  {mine} vs {peer}: {med[peer] / med[mine]:.2f}x (per round: median {statistics.median(rounds):.2f}x, "
            f"{rounds[0]:.2f}–{rounds[-1]:.2f}x)")


def print_profiles(steps, precisions):
    """One more step of each ``mapet <precision>`` entry of ``steps`` under mapet.profile(), printed."""
    for p in precisions:
        with mapet.profile() as prof:
            steps[f"mapet {p}"]()
        print(f"\nmapet.profile() of one mapet {p} step:\n{prof}")
