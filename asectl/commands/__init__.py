"""Stage commands beyond the core ones in ``asectl.cli``; each module has ``register(cli)``."""
