#!/usr/bin/env bash
# Debian packages headwise uses for real data and the report check:
#   wordnet-base  WordNet 3.0 (retrieval data, the hyperbolic hierarchy)
#   chromium, chromium-driver  the headless browser that checks the HTML report
#   dict-foldoc, dict-devil    dictionaries written independently of WordNet: the transfer query sets
# Installs only what is missing; as root through apt-get, otherwise it says what to run.
set -euo pipefail
missing=()
[ -e /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
[ -e /usr/share/dictd/foldoc.index ] || missing+=(dict-foldoc)
[ -e /usr/share/dictd/devil.index ] || missing+=(dict-devil)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "warning: missing Debian packages ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
    echo "         the tests that need them are skipped (CI sets HEADWISE_REQUIRE_DATA=1 and fails instead)" >&2
fi
