"""The `seqssm` command line (Typer). Thin: parses options, calls seqssm.pipelines."""
