"""Structured output: grammars (llguidance) compiled off the engine thread, cached by their
spec, and one matcher per constrained request whose state follows its tokens. No torch here:
the sampler applies the masks (``engine/executor/sampler.py``), the frontend validates specs."""
