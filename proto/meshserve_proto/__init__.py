"""Generated KServe v2 protocol code. Regenerate with `make proto`; a test checks it is current."""
