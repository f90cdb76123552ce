"""Set-level reports over a job's audit records (the bias report; ``genpipe report ...``)."""
