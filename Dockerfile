FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends nodejs npm && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir . && bash scripts/bootstrap.sh --anvil-only
ENV PATH="/app/.devtools/bin:${PATH}"
EXPOSE 8402 8403 8545
CMD ["x402c", "serve"]
