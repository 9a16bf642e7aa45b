"""The aiohttp side: the application, admission, refusals, sessions, limits and responses."""
