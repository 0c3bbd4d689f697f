# syntax=docker/dockerfile:1
# kube-relay container image: built from this repository, run as non-root on distroless.
#
#   docker build -t kube-relay:dev .
#   docker run --read-only --cap-drop ALL --security-opt no-new-privileges \
#     -v "$PWD/relay:/etc/kube-relay:ro" -p 8443:8443 kube-relay:dev
#
# The root filesystem is never written to (run it read-only: --read-only, or
# readOnlyRootFilesystem in Kubernetes); configuration, certificates and token files are
# mounted under /etc/kube-relay. Pin both base images by digest in your registry mirror.

# --- build ---
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The whole workspace (manifests may name tests and benches); .dockerignore keeps build
# output, virtualenvs, node_modules, git history and any local keys out of the context.
COPY . .
# --locked: exactly the dependency versions that were tested. --no-default-features: the
# shipped relay leaves out `kube-relay dev` and the simulated clusters it links.
RUN cargo build --release --locked --no-default-features --bin kube-relay \
 && install -D -m 0755 target/release/kube-relay /out/kube-relay

# --- run ---
# distroless/cc: glibc and CA roots only (aws-lc-rs links against glibc); no shell, no package
# manager. The :nonroot variant runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/kube-relay /usr/local/bin/kube-relay
USER 65532:65532
# 8443: client TLS (the load balancer forwards 443 here); 9090: admin (/healthz /readyz /metrics).
EXPOSE 8443 9090
# The image has no shell or HTTP client for a HEALTHCHECK command; Kubernetes probes and the
# Azure load balancer probe call /readyz and /healthz on the admin port instead.
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/kube-relay"]
CMD ["serve", "--config", "/etc/kube-relay/relay.yaml"]
