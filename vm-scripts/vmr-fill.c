// SPDX-License-Identifier: GPL-2.0
/*
 * vmr-fill: test data for the boot tests, fast enough under TCG.
 *
 *   vmr-fill SEED MIB      writes MIB MiB of data to stdout
 *   vmr-fill -c SEED MIB   reads MIB MiB from stdin and checks them: "vmr-fill: ok", or
 *                          "vmr-fill: MISMATCH at byte N" (exit 1), or "vmr-fill: SHORT ..."
 *   vmr-fill -p MIB        holds MIB MiB of its own memory with extra page references (the
 *                          pages spliced into pipes with vmsplice) until it is killed: pages
 *                          no migration can move, as a process pinning them would; prints
 *                          "vmr-fill: holding MIB MiB" once they are held
 *
 * Every 8-byte word is splitmix64(SEED, its offset): pseudo-random, and different in every
 * page and every file, so a page lost, zeroed, duplicated or moved to another place is
 * found. /dev/urandom under TCG writes about 25 MiB/s and md5sum reads about as slowly;
 * this writes and checks several hundred MiB/s, which keeps the tests that need GiBs of
 * data within CI's time. Built static by vm-scripts/build-initramfs into /bin.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#define CHUNK (1 << 20)

static uint64_t word(uint64_t seed, uint64_t i)
{
	uint64_t z = seed * 0x9e3779b97f4a7c15ULL + i * 0xbf58476d1ce4e5b9ULL;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static void fill(uint64_t *buf, uint64_t seed, uint64_t first)
{
	for (size_t j = 0; j < CHUNK / 8; j++)
		buf[j] = word(seed, first + j);
}

/* Splices `mib` MiB of anonymous memory into pipes of 1 MiB each and keeps them open. */
static int hold(uint64_t mib)
{
	size_t len = mib * CHUNK;
	char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (buf == MAP_FAILED) {
		perror("vmr-fill: mmap");
		return 1;
	}
	memset(buf, 0x5a, len);
	for (size_t off = 0; off < len; off += CHUNK) {
		struct iovec iov = { buf + off, CHUNK };
		int p[2];

		if (pipe(p) || fcntl(p[1], F_SETPIPE_SZ, CHUNK) < 0) {
			perror("vmr-fill: pipe");
			return 1;
		}
		while (iov.iov_len) {
			ssize_t r = vmsplice(p[1], &iov, 1, 0);

			if (r <= 0) {
				perror("vmr-fill: vmsplice");
				return 1;
			}
			iov.iov_base = (char *)iov.iov_base + r;
			iov.iov_len -= r;
		}
	}
	printf("vmr-fill: holding %llu MiB\n", (unsigned long long)mib);
	fflush(stdout);
	for (;;)
		pause();
}

int main(int argc, char **argv)
{
	static uint64_t want[CHUNK / 8], got[CHUNK / 8];
	int check = argc == 4 && !strcmp(argv[1], "-c");
	uint64_t seed, mib, n;

	if (argc == 3 && !strcmp(argv[1], "-p"))
		return hold(strtoull(argv[2], NULL, 0));
	if (argc != 3 + check) {
		fprintf(stderr, "usage: vmr-fill [-c] SEED MIB | vmr-fill -p MIB\n");
		return 2;
	}
	seed = strtoull(argv[1 + check], NULL, 0);
	mib = strtoull(argv[2 + check], NULL, 0);
	for (n = 0; n < mib; n++) {
		uint64_t first = n * (CHUNK / 8);
		size_t done = 0;

		fill(want, seed, first);
		while (done < CHUNK) {
			ssize_t r = check ? read(0, (char *)got + done, CHUNK - done)
					  : write(1, (char *)want + done, CHUNK - done);
			if (r <= 0) {
				if (check) {
					printf("vmr-fill: SHORT: %llu bytes of %llu\n",
					       (unsigned long long)(n * CHUNK + done),
					       (unsigned long long)(mib * CHUNK));
					return 1;
				}
				perror("vmr-fill: write");
				return 1;
			}
			done += r;
		}
		if (check && memcmp(want, got, CHUNK)) {
			size_t j = 0;

			while (want[j] == got[j])
				j++;
			printf("vmr-fill: MISMATCH at byte %llu\n",
			       (unsigned long long)(n * CHUNK + j * 8));
			return 1;
		}
	}
	if (check) {
		char extra;

		if (read(0, &extra, 1) > 0) {
			printf("vmr-fill: LONGER than %llu MiB\n", (unsigned long long)mib);
			return 1;
		}
		printf("vmr-fill: ok\n");
	}
	return 0;
}
