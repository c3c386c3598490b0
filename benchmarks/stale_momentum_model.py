"""Stability of heavy-ball momentum fed delayed gradients, in a scalar model.

    python benchmarks/stale_momentum_model.py [--momentum 0.9] [--weight 0.5]

On f(x) = h x^2 / 2 the update rules below are iterated from x = 1; the table gives the
largest step a*h (to 0.001) for which x stays bounded, with gradients 1 and 2 steps old.
It is the reasoning behind docs/staleness.md, "Convergence": how much each way of
treating a stale gradient under momentum m (weight w = 1/(1+s)) shrinks the stable step.
"""

from __future__ import annotations

import argparse

RULES = {
    "synchronous heavy ball": "sync",
    "delayed, undamped": "delay",
    "step w, 1 - w back to the residual (first pass)": "return",
    "step w (the optimizer's momentum path)": "step",
    "intake w: u = m u + w g, (1 - w) g straight to the residual": "intake",
}


def stable(rule: str, ah: float, delay: int, m: float, w: float, steps: int = 3000) -> bool:
    """Whether iterating `rule` with step a*h = `ah` keeps x bounded."""
    xs = [1.0] * (delay + 1)
    u = r = 0.0
    for _ in range(steps):
        g = ah * (xs[-1] if rule == "sync" else xs[-1 - delay])
        if rule in ("sync", "delay"):
            u = m * u + g
            step = u
        elif rule == "return":  # the step takes w of v = r + u, the rest stays in r
            u = m * u + g
            v = r + u
            step, r = w * v, (1 - w) * v
        elif rule == "step":
            u = m * u + g
            step = w * u
        else:  # intake
            u = m * u + w * g
            step = u + (1 - w) * g
        xs.append(xs[-1] - step)
        if abs(xs[-1]) > 1e6:
            return False
    return abs(xs[-1]) < 10


def limit(rule: str, delay: int, m: float, w: float) -> float:
    """The largest stable a*h on a grid of 0.001 up to 4 (the first unstable one, less
    a grid step)."""
    for i in range(1, 4001):
        if not stable(rule, i / 1000, delay, m, w):
            return (i - 1) / 1000
    return 4.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight", type=float, default=0.5, help="w of a stale gradient")
    args = parser.parse_args()
    print(f"largest stable a*h, momentum {args.momentum}, w {args.weight}")
    print(f"{'update rule':<62}  delay 1  delay 2")
    for name, rule in RULES.items():
        print(f"{name:<62}  {limit(rule, 1, args.momentum, args.weight):7.3f}  "
              f"{limit(rule, 2, args.momentum, args.weight):7.3f}")


if __name__ == "__main__":
    main()
