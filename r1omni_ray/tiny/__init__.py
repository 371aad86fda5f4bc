"""The embedded default's tiny world: a random-init tiny HumanOmni checkpoint in the real layout, its locally
built tokenizers and processor, and the synthetic emotion task (coloured frames + pitched tones). The demo,
the tests and the benchmarks build on it; the real training path never imports it."""
