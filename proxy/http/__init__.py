"""The forwarding path: client-side and upstream-side asyncio Protocols."""
