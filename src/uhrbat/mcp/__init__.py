"""`uhrbat mcp`: UHR-BAT as Model Context Protocol tools for agents (needs the `mcp` extra).

- `scenes`: the bounded table of scene handles (unguessable ids, max scenes, idle TTL) and the
  allowed-folder rule for paths;
- `adapter`: the only code that calls the pipeline (how a scene is kept; regions);
- `service`: what each tool does (plain methods: open_scene, ask, look, describe_scene, close_scene);
- `schemas`: typed tool arguments and results (pydantic -> the tools' JSON schemas);
- `views`: the bounded PNGs of `look`;
- `server`: the tools on the `mcp` SDK's `MCPServer`, stdio and streamable HTTP transports.

The `mcp` SDK is imported by `uhrbat.mcp.server` only.
"""
