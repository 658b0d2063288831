"""Tiny GSM8K and code problems for smoke runs: the real formats, no files.

    synthetic_text.arithmetic(4, seed=0)[0]
    # Problem(question="What is 3 + 4?", answer="3 + 4 = 7\\n#### 7")
    synthetic_text.functions(4, seed=0, benchmark="mbpp")[0].prompt
    # "Write a function add_3(x) that returns x plus 3."

``arithmetic`` rows are :class:`floranna_jax.data.gsm8k.Problem` (answers end in "#### N");
``functions`` rows are :class:`floranna_jax.data.code.Problem`, MBPP-style (a description
and asserts) or HumanEval-style (a signature with a docstring and a ``check`` function),
each with a correct reference solution. Deterministic in ``seed``.
"""

import numpy as np

from floranna_jax.data import code, gsm8k

_OPS = {"plus": ("+", "add"), "minus": ("-", "sub"), "times": ("*", "mul")}


def arithmetic(n: int, *, seed: int = 0) -> list[gsm8k.Problem]:
    """``n`` one-step sums, differences and products of numbers 1-9."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(1, 10, size=2))
        symbol, _ = _OPS[str(rng.choice(list(_OPS)))]
        value = eval(f"{a} {symbol} {b}")  # noqa: S307 (two digits and an operator we drew)
        rows.append(gsm8k.Problem(f"What is {a} {symbol} {b}?",
                                  f"{a} {symbol} {b} = {value}\n#### {value}"))  # fmt: skip
    return rows


def functions(n: int, *, seed: int = 0, benchmark: str = "mbpp") -> list[code.Problem]:
    """``n`` functions ``<op>_<k>(x)`` returning ``x <op> k``, as MBPP or HumanEval problems."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        word = str(rng.choice(list(_OPS)))
        symbol, stem = _OPS[word]
        k = int(rng.integers(1, 10))
        name = f"{stem}_{k}"
        body = f"    return x {symbol} {k}\n"
        asserts = tuple(f"assert {name}({x}) == {eval(f'{x} {symbol} {k}')}"  # noqa: S307
                        for x in (1, 5))  # fmt: skip
        if benchmark == "mbpp":
            text = f"Write a function {name}(x) that returns x {word} {k}."
            solution = f"def {name}(x):\n{body}"
            rows.append(code.Problem("mbpp", f"MBPP/synthetic_{i}", text, solution,
                                     "\n".join(asserts), asserts, "", ""))  # fmt: skip
        else:
            prompt = f'def {name}(x):\n    """Return x {word} {k}."""\n'
            check = "def check(f):\n" + "".join(
                f"    {a.replace(name + '(', 'f(')}\n" for a in asserts
            )
            rows.append(code.Problem("humaneval", f"HumanEval/synthetic_{i}", prompt, body,
                                     check, (), "", name))  # fmt: skip
    return rows
