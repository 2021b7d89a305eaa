# Kamailio 5.6 from Debian bookworm, plus the http_async_client module that
# Debian does not ship and Debian's dialog module with
# kamailio/patches/dialog-bye-both-legs.patch (both built from Debian's own
# source package by scripts/build-kamailio-modules.sh, exactly as on a
# developer's machine).
# Build context: the repository root (see compose.yaml).

# --- build stage: compile the two modules against Debian's kamailio ----------
FROM debian:bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      kamailio libcurl4-openssl-dev libevent-dev bison flex make gcc pkg-config patch \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY scripts/lib.sh scripts/build-kamailio-modules.sh /src/scripts/
COPY kamailio/patches/ /src/kamailio/patches/
# Builds in /src/.build, installs the modules and checks that they load; then
# we put the .so files at a fixed path for the next stage.
RUN /src/scripts/build-kamailio-modules.sh \
 && mkdir -p /out \
 && cp "$(dirname "$(dpkg -L kamailio | grep '/modules/tm\.so$')")/http_async_client.so" /out/ \
 && cp /usr/local/lib/kamailio/modules/dialog.so /out/

# --- runtime stage ------------------------------------------------------------
FROM debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      kamailio kamailio-extra-modules kamailio-postgres-modules kamailio-utils-modules \
      libcurl4 libevent-2.1-7 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/http_async_client.so /tmp/http_async_client.so
COPY --from=build /out/dialog.so /usr/local/lib/kamailio/modules/dialog.so
RUN moddir="$(dirname "$(dpkg -L kamailio | grep '/modules/tm\.so$')")" \
 && install -m 0644 /tmp/http_async_client.so "$moddir/" \
 && rm /tmp/http_async_client.so
COPY kamailio/ /etc/kamailio/project/
COPY docker/kamailio-entrypoint.sh /usr/local/bin/kamailio-entrypoint
EXPOSE 5060/udp 5060/tcp
ENTRYPOINT ["/usr/local/bin/kamailio-entrypoint"]
