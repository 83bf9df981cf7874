"""``python -m camseg.audit CKPT DATA_ROOT --out DIR``: see :mod:`camseg.audit.cli`."""

from camseg.audit.cli import main

main()
