"""How a gradient becomes an update: each strategy implements the engine's ``Updater``."""
