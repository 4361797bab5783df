"""Chemistry: SMILES tokenisation, molecule data, MOSES metrics and pictures."""
