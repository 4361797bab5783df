from seqssm.tokenizers.dna import DNATokenizer

__all__ = ["DNATokenizer"]
