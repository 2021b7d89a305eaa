# The admission sidecar (aiohttp + asyncpg). Build context: the repository root.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml ./
COPY sidecar/ sidecar/
# sidecar/db.py finds its migrations at <package dir>/../sql/migrations, so the
# package is installed in place (-e) next to sql/ rather than into site-packages.
COPY sql/ sql/
RUN pip install --no-cache-dir -e .
EXPOSE 8080
CMD ["sidecar", "serve"]
