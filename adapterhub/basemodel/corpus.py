"""The synthetic pre-training corpus: generic string skills in the shipped record format.

The base model learns the ``"<op>: <input> =" -> " <output>"`` format, how to copy and move
characters by attention, which letters pair up across cases and the order of the alphabet.
None of these operations is a shipped adapter task (see ``adapterhub.tasks``): the base should
know the skills those tasks build on but not the tasks themselves.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from adapterhub.data import Record

LOWER, UPPER, DIGITS = string.ascii_lowercase, string.ascii_uppercase, string.digits
MIXED = LOWER + UPPER + DIGITS


def _word(rng: random.Random, low: int = 2, high: int = 10, chars: str = MIXED) -> str:
    return "".join(rng.choices(chars, k=rng.randint(low, high)))


def _rec(op: str, arg: str, out: str) -> Record:
    return Record(f"{op}: {arg} =", f" {out}")


def _copy(rng: random.Random) -> Record:
    w = _word(rng)
    return _rec("copy", w, w)


def _repeat(rng: random.Random) -> Record:
    w = _word(rng, 2, 6)
    return _rec("repeat", w, w + w)


def _double(rng: random.Random) -> Record:
    w = _word(rng, 2, 6)
    return _rec("double", w, "".join(c + c for c in w))


def _rotate(rng: random.Random) -> Record:
    w = _word(rng, 3, 10)
    return _rec("rotate", w, w[1:] + w[0])


def _first(rng: random.Random) -> Record:
    w = _word(rng)
    return _rec("first", w, w[0])


def _last(rng: random.Random) -> Record:
    w = _word(rng)
    return _rec("last", w, w[-1])


def _length(rng: random.Random) -> Record:
    w = _word(rng, 1, 9)
    return _rec("length", w, str(len(w)))


def _lowercase(rng: random.Random) -> Record:
    # Mostly upper-case input so the model learns each upper/lower letter pair.
    w = _word(rng, 2, 10, UPPER * 3 + LOWER + DIGITS)
    return _rec("lowercase", w, w.lower())


def _alphabet(rng: random.Random) -> Record:
    # Continue the alphabet (or the digits) from a start character: knowledge of order.
    chars = rng.choice((LOWER, UPPER, LOWER, DIGITS))
    start = rng.randrange(len(chars) - 3)
    stop = min(len(chars), start + rng.randint(3, 8))
    return _rec("alphabet", chars[start], chars[start:stop])


def _zip(rng: random.Random) -> Record:
    n = rng.randint(2, 5)
    a, b = _word(rng, n, n), _word(rng, n, n)
    return _rec("zip", f"{a} {b}", "".join(x + y for x, y in zip(a, b, strict=True)))


OPS: dict[str, Callable[[random.Random], Record]] = {
    "copy": _copy,
    "repeat": _repeat,
    "double": _double,
    "rotate": _rotate,
    "first": _first,
    "last": _last,
    "length": _length,
    "lowercase": _lowercase,
    "alphabet": _alphabet,
    "zip": _zip,
}
# Copying is the skill every adapter task builds on, so it gets the largest share.
WEIGHTS: dict[str, float] = {name: 1.0 for name in OPS} | {"copy": 3.0}


def sample_records(rng: random.Random, n: int) -> list[Record]:
    """Draw ``n`` records from the operation mix (weighted by ``WEIGHTS``)."""
    names = rng.choices(list(OPS), weights=[WEIGHTS[k] for k in OPS], k=n)
    return [OPS[name](rng) for name in names]


def sample_op(rng: random.Random, op: str, n: int) -> list[Record]:
    """``n`` records of a single operation (to probe one skill)."""
    return [OPS[op](rng) for _ in range(n)]
