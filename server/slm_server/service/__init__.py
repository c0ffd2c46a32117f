"""The serving logic between the routers and the engine, one module per concern:

- `jobs`: a request's record (what its log line says) and its jobs (one generation per choice);
- `admission`: a bounded number of generations at once, a bounded queue, 429 beyond it;
- `faults`: fault injection (alert tests, the demo), off unless opted in;
- `streaming`: a generation's text as it comes, and the choices' streams merged;
- `accounting`: once per generation, its metrics, its log fields and its drift signals;
- `serving`: `GenerationService`, what the routers call: request checks, deadlines, running blocking
  generation in worker threads that can be stopped between tokens.
"""
