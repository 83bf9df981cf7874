# Makes conf/ the package ``camseg.conf`` in a built wheel (see pyproject.toml's package-dir),
# which the installed ``camseg`` reads through Hydra's ``pkg://camseg.conf``.
