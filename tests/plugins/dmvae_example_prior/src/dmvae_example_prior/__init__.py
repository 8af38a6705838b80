"""Example third-party prior package for dmvae-prior-bench."""
