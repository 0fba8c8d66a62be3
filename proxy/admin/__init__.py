"""The admin listener: metrics, health, status and explain (aiohttp)."""
