"""--report-to's tracker names: which exist, the module each library is imported as, and parsing the list."""
from __future__ import annotations

import difflib

from aligndistil_cli.core.errors import ConfigError

# backend -> the module its library is imported as (the extra has the backend's name).
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def parse_report_to(value: str | None) -> list[str]:
    """'tensorboard,wandb' -> ['tensorboard', 'wandb']; 'none' -> []; a typo gets a did-you-mean."""
    names = [v.strip() for v in (value or "none").split(",") if v.strip()]
    for name in names:
        if name != "none" and name not in MODULES:
            close = difflib.get_close_matches(name, [*MODULES, "none"], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config field 'report_to': unknown tracker {name!r}{hint} "
                              f"(choose from none, {', '.join(MODULES)})")
    return list(dict.fromkeys(n for n in names if n != "none"))
