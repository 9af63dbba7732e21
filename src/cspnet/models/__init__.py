"""Model families: one file each, a typed config per variant plus a builder."""
