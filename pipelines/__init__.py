"""End-to-end jobs behind the CLI commands: read -> batch -> model -> write, with progress and resume."""
