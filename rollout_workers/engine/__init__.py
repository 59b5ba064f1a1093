"""The embedded inference engine: a small continuous-batching server for SGLang's RL HTTP API.

model.py loads and creates model folders, scheduler.py is the engine core,
server.py the aiohttp front end, protocol.py the request bodies.
"""

__version__ = "0.1.0"
