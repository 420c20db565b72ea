"""``python -m tied_lora_kernels`` runs the self-check; ``python -m tied_lora_kernels bench [...]`` the benchmarks."""

import sys

USAGE = (
    "python -m tied_lora_kernels [selfcheck]   the self-check (parity with the float64 reference, parameter counts)\n"
    "python -m tied_lora_kernels bench [...]   the benchmark report (bench --help for its options)"
)
"""What ``--help`` prints (not the docstring, which ``python -OO`` strips)."""


def main(argv: list[str]) -> int:
    if argv and argv[0] == "bench":
        from tied_lora_kernels.bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[-1] in ("-h", "--help") and argv[0] in ("-h", "--help", "selfcheck"):
        print(USAGE)
        return 0
    if argv and argv[0] not in ("selfcheck",):
        print(f"unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    if argv[1:]:  # (the self-check takes no options)
        print(f"selfcheck takes no arguments, got {argv[1:]}\n{USAGE}", file=sys.stderr)
        return 2
    from tied_lora_kernels.selfcheck import main as selfcheck_main

    return selfcheck_main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
