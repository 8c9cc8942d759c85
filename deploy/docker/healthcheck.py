"""Container health check: exit 0 when the service of the config answers GET /readyz with 200.

    python healthcheck.py [/etc/vfm/config.yaml]

The port comes from the config, the one place that names it.
"""
from __future__ import annotations

import sys
import urllib.error
import urllib.request

from vfm.service.config import load_config


def main(argv: list[str]) -> int:
    cfg = load_config(argv[1] if len(argv) > 1 else "/etc/vfm/config.yaml", check_models=False)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{cfg.port}/readyz", timeout=5) as answer:
            return 0 if answer.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"vfm is not ready: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
