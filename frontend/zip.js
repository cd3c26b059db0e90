// A small, dependency-free ZIP writer for the segmentation tab's "DICOM study folder" choice: the
// chosen files go into one zip of "stored" entries (method 0, no compression: DICOM pixel data
// barely deflates) with CRC-32, local headers, a central directory and the end record, which the
// segmenter reads with Python's zipfile exactly as a zip the user made. No ZIP64: a study of 4 GiB
// or 65,535 files is far above any server's upload limit and is refused here as too large.

const LOCAL_HEADER = 0x04034b50;
const CENTRAL_HEADER = 0x02014b50;
const END_RECORD = 0x06054b50;
const VERSION = 20;  // 2.0: stored entries and folders
const UTF8_NAMES = 0x0800;  // general-purpose flag bit 11: names are UTF-8
const MAX_ZIP_BYTES = 0xffffffff;
const MAX_ENTRIES = 0xffff;

/** Files that are never part of a study: the desktop's own bookkeeping. */
const JUNK = /(^|\/)(\.DS_Store|Thumbs\.db|ehthumbs\.db|desktop\.ini|\._[^/]*)$|(^|\/)__MACOSX\//i;

/** A zip that cannot be written (too many files, or too large without ZIP64). */
export class ZipLimitError extends Error {}

let crcTable = null;

/** CRC-32 (IEEE 802.3, as zip uses) of ``bytes``, continuing from ``crc`` for data read in parts. */
export function crc32(bytes, crc = 0) {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n += 1) {
      let c = n;
      for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let c = ~crc >>> 0;
  for (let i = 0; i < bytes.length; i += 1) c = crcTable[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

/**
 * The zip name of a chosen file: its path relative to the chosen folder (``webkitRelativePath``)
 * or its base name, with "/" separators, no leading "/", and no "." or ".." parts.
 */
export function entryName(file) {
  const path = (file.webkitRelativePath || file.name || "").replace(/\\/g, "/");
  const parts = path.split("/").filter((part) => part && part !== "." && part !== "..");
  return parts.length ? parts.join("/") : "file";
}

/** Whether a chosen file is desktop junk (.DS_Store, Thumbs.db, AppleDouble "._" files) to leave out. */
export function isJunk(file) {
  return JUNK.test(entryName(file));
}

/** MS-DOS time and date (local time, 2-second steps, from 1980) of a timestamp in ms. */
function dosDateTime(ms) {
  const d = new Date(Number.isFinite(ms) && ms > 315532800000 ? ms : 315532800000);
  const time = (d.getHours() << 11) | (d.getMinutes() << 5) | (d.getSeconds() >> 1);
  const date = ((d.getFullYear() - 1980) << 9) | ((d.getMonth() + 1) << 5) | d.getDate();
  return { time, date };
}

/** A little-endian record: ``fields`` are [size in bytes (2 or 4), value] pairs, then ``tail`` bytes. */
function record(fields, tail) {
  const size = fields.reduce((sum, [bytes]) => sum + bytes, 0);
  const out = new Uint8Array(size + tail.length);
  const view = new DataView(out.buffer);
  let at = 0;
  for (const [bytes, value] of fields) {
    if (bytes === 2) view.setUint16(at, value, true);
    else view.setUint32(at, value, true);
    at += bytes;
  }
  out.set(tail, at);
  return out;
}

/**
 * Pack ``files`` (File or Blob objects with a ``name``) into one zip of stored entries.
 * Each file is read once for its CRC; the zip Blob refers to the files, not to copies of them.
 * Duplicate names get a "~2", "~3"... suffix.
 * @param {Iterable<File>} files
 * @param {{onProgress?: (done: number, total: number) => void}} options
 * @returns {Promise<Blob>} an ``application/zip`` Blob
 * @throws {ZipLimitError} over 65,535 files or 4 GiB
 */
export async function zipFiles(files, { onProgress } = {}) {
  const list = Array.from(files);
  if (list.length > MAX_ENTRIES) throw new ZipLimitError(`${list.length} files; a zip here holds at most ${MAX_ENTRIES}`);
  const encoder = new TextEncoder();
  const parts = [];
  const central = [];
  const used = new Set();
  let offset = 0;
  for (const [index, file] of list.entries()) {
    let name = entryName(file);
    for (let n = 2; used.has(name); n += 1) name = `${entryName(file)}~${n}`;
    used.add(name);
    const nameBytes = encoder.encode(name);
    const crc = crc32(new Uint8Array(await file.arrayBuffer()));
    const { time, date } = dosDateTime(file.lastModified);
    const common = [[2, VERSION], [2, UTF8_NAMES], [2, 0], [2, time], [2, date], [4, crc], [4, file.size],
      [4, file.size], [2, nameBytes.length], [2, 0]];
    const local = record([[4, LOCAL_HEADER], ...common], nameBytes);
    if (offset + local.length + file.size > MAX_ZIP_BYTES) {
      throw new ZipLimitError("the folder is larger than 4 GiB, more than a zip without ZIP64 holds");
    }
    central.push(record([[4, CENTRAL_HEADER], [2, VERSION], ...common, [2, 0], [2, 0], [2, 0], [4, 0], [4, offset]],
      nameBytes));
    parts.push(local, file);
    offset += local.length + file.size;
    if (onProgress) onProgress(index + 1, list.length);
  }
  const directorySize = central.reduce((sum, entry) => sum + entry.length, 0);
  if (offset + directorySize + 22 > MAX_ZIP_BYTES) {
    throw new ZipLimitError("the folder is larger than 4 GiB, more than a zip without ZIP64 holds");
  }
  const end = record([[4, END_RECORD], [2, 0], [2, 0], [2, central.length], [2, central.length],
    [4, directorySize], [4, offset], [2, 0]], new Uint8Array(0));
  return new Blob([...parts, ...central, end], { type: "application/zip" });
}

/**
 * A folder chosen with ``<input type="file" webkitdirectory>``: its name and its files, less desktop junk.
 * @param {FileList|File[]} chosen
 * @returns {{folder: string, files: File[]}}
 */
export function chosenFolder(chosen) {
  const all = Array.from(chosen);
  const first = all.length ? all[0].webkitRelativePath || "" : "";
  return { folder: first.includes("/") ? first.split("/")[0] : "", files: all.filter((file) => !isJunk(file)) };
}

/** Pack a :func:`chosenFolder` into one zip File named after the folder. */
export async function zipFolder({ folder, files }, options = {}) {
  const blob = await zipFiles(files, options);
  return new File([blob], `${folder || "folder"}.zip`, { type: "application/zip" });
}
