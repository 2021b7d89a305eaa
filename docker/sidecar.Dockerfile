# The admission sidecar (aiohttp + asyncpg). Build context: the repository root.
FROM python:3.11-slim
WORKDIR /app
# Install dependencies and the package (wheels exist for asyncpg, uvloop, orjson).
COPY pyproject.toml ./
COPY sidecar/ sidecar/
RUN pip install --no-cache-dir .
# Schema files, for `sidecar migrate` when it reads them from ./sql.
COPY sql/ sql/
EXPOSE 8080
CMD ["sidecar", "serve"]
