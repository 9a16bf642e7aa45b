"""The aiohttp side: the application, the admission pipeline, sessions, limits and responses."""
