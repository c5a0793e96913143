/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The virtio-mem device ABI this driver is written against (virtio spec 1.2,
 * "Memory Device"). Same layout and include guard as the kernel's
 * include/uapi/linux/virtio_mem.h, so the two never clash.
 *
 * Everything the device writes (config space, responses) is untrusted: the driver
 * validates it before use.
 */
#ifndef _LINUX_VIRTIO_MEM_H
#define _LINUX_VIRTIO_MEM_H

#include <linux/types.h>
#include <linux/virtio_types.h>
#include <linux/virtio_ids.h>
#include <linux/virtio_config.h>

/* Feature bits */
/* The config's node_id is an ACPI PXM. */
#define VIRTIO_MEM_F_ACPI_PXM			0
/* Unplugged memory must not be accessed. */
#define VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE	1
/* Plugged memory persists across suspend. */
#define VIRTIO_MEM_F_PERSISTENT_SUSPEND		2

/* Requests (driver -> device) */
/* Plug nb_blocks device blocks starting at addr. */
#define VIRTIO_MEM_REQ_PLUG			0
/* Unplug nb_blocks device blocks starting at addr. */
#define VIRTIO_MEM_REQ_UNPLUG			1
/* Unplug all memory; the usable region may shrink. */
#define VIRTIO_MEM_REQ_UNPLUG_ALL		2
/* Query whether a range is plugged, unplugged or mixed. */
#define VIRTIO_MEM_REQ_STATE			3

struct virtio_mem_req_plug {
	__virtio64 addr;
	__virtio16 nb_blocks;
	__virtio16 padding[3];
};

struct virtio_mem_req_unplug {
	__virtio64 addr;
	__virtio16 nb_blocks;
	__virtio16 padding[3];
};

struct virtio_mem_req_state {
	__virtio64 addr;
	__virtio16 nb_blocks;
	__virtio16 padding[3];
};

/* 24 bytes */
struct virtio_mem_req {
	__virtio16 type;
	__virtio16 padding[3];

	union {
		struct virtio_mem_req_plug plug;
		struct virtio_mem_req_unplug unplug;
		struct virtio_mem_req_state state;
	} u;
};

/* Responses (device -> driver) */
/* The request was processed. */
#define VIRTIO_MEM_RESP_ACK			0
/* The request was refused (plug: more than the requested size). Retry later. */
#define VIRTIO_MEM_RESP_NACK			1
/* The device is busy (e.g. migrating). Retry later. */
#define VIRTIO_MEM_RESP_BUSY			2
/* The request was invalid. */
#define VIRTIO_MEM_RESP_ERROR			3

/* STATE answers */
#define VIRTIO_MEM_STATE_PLUGGED		0
#define VIRTIO_MEM_STATE_UNPLUGGED		1
#define VIRTIO_MEM_STATE_MIXED			2

struct virtio_mem_resp_state {
	__virtio16 state;
};

/* 10 bytes */
struct virtio_mem_resp {
	__virtio16 type;
	__virtio16 padding[3];

	union {
		struct virtio_mem_resp_state state;
	} u;
};

/* Config space (little endian, read-only for the driver) */
struct virtio_mem_config {
	/* Size and alignment of a device block; a power of two. */
	__le64 block_size;
	/* Node of the memory (an ACPI PXM with VIRTIO_MEM_F_ACPI_PXM). */
	__le16 node_id;
	__u8 padding[6];
	/* Start of the device-managed region. */
	__le64 addr;
	/* Size of the device-managed region. */
	__le64 region_size;
	/* The part of the region that can currently be plugged. */
	__le64 usable_region_size;
	/* Currently plugged size. */
	__le64 plugged_size;
	/* The size the device wants plugged. */
	__le64 requested_size;
};

#endif /* _LINUX_VIRTIO_MEM_H */
