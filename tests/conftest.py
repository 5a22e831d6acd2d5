from tests.agents import swarm  # noqa: F401  (fixture shared by integration tests)
