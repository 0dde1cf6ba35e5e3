"""Pure-logic tests: modules and blocks checked on their own, no node started (some start helper
processes: gloo ranks, a fake hub, an import check)."""
