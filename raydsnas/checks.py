"""The two messages every configuration check in raydsnas speaks, in one place: a value that is
not allowed (`check`) and keys that do not exist (`check_known`). Each layer raises its own
error type through them (`ConfigError` for a job file, `DataSpecError` for `data`, `ValueError`
for a strategy's or a space's settings used from Python), so a user reads the same sentence
whichever part found the problem:

    search.h = 1.5 is not allowed; expected a number in (0, 1]
    scaling: unknown key(s) ['num_worker']; allowed: ['num_workers', 'use_gpu', ...]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check(ok: bool, key: str, value: Any, allowed: str, error: type[Exception] = ValueError
          ) -> None:
    """Raise `error("<key> = <value> is not allowed; expected <allowed>")` unless `ok`."""
    if not ok:
        raise error(f"{key} = {value!r} is not allowed; expected {allowed}")


def check_known(section: str, given: Iterable[str], allowed: Iterable[str],
                error: type[Exception] = ValueError, suffix: str = "") -> None:
    """Raise `error("<section>: unknown key(s) [...]; allowed: [...]")` for any key of
    `given` not in `allowed` (listed in `allowed`'s order); `suffix` follows the section
    name (e.g. " for s3://bucket")."""
    allowed = list(allowed)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise error(f"{section}: unknown key(s) {unknown}{suffix}; allowed: {allowed}")
