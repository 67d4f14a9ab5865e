"""Model implementations of our own, for families that neither ``transformers`` nor ``timm`` provides."""
