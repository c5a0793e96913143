// SPDX-License-Identifier: GPL-2.0
/*
 * vmr-fill: test data for the boot tests, fast enough under TCG.
 *
 *   vmr-fill SEED MIB      writes MIB MiB of data to stdout
 *   vmr-fill -c SEED MIB   reads MIB MiB from stdin and checks them: "vmr-fill: ok", or
 *                          "vmr-fill: MISMATCH at byte N" (exit 1), or "vmr-fill: SHORT ..."
 *
 * Every 8-byte word is splitmix64(SEED, its offset): pseudo-random, and different in every
 * page and every file, so a page lost, zeroed, duplicated or moved to another place is
 * found. /dev/urandom under TCG writes about 25 MiB/s and md5sum reads about as slowly;
 * this writes and checks several hundred MiB/s, which keeps the tests that need GiBs of
 * data within CI's time. Built static by vm-scripts/build-initramfs into /bin.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

int main(int argc, char **argv)
{
	static uint64_t want[CHUNK / 8], got[CHUNK / 8];
	int check = argc == 4 && !strcmp(argv[1], "-c");
	uint64_t seed, mib, n;

	if (argc != 3 + check) {
		fprintf(stderr, "usage: vmr-fill [-c] SEED MIB\n");
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
