# The wheelhouse as an image, for builders without named build contexts (Docker 20.10's BuildKit):
#   docker build -f containers/wheelhouse.Dockerfile -t vlmforge-wheelhouse:local build/wheelhouse
# then --build-arg WHEELHOUSE_IMAGE=vlmforge-wheelhouse:local. Only mounted during builds: no image
# that vlmforge runs in contains it.
FROM scratch
COPY . /
