"""Developer tooling that is not a backend: checks and emulators that run the backends' code
against documented vendor behaviour without the vendor's hardware."""
