"""What the step benches share (imported as ``from _common import ...``; the benches put bench/ on sys.path)."""
import mapet


def print_profiles(steps, precisions):
    """One more step of each ``mapet <precision>`` entry of ``steps`` under mapet.profile(), printed."""
    for p in precisions:
        with mapet.profile() as prof:
            steps[f"mapet {p}"]()
        print(f"\nmapet.profile() of one mapet {p} step:\n{prof}")
