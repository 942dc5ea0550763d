"""The CPU's feature flags, for tests whose expectations depend on what the CPU can execute."""


def cpu_flags() -> set:
    """Flags of the first processor in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
